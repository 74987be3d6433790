"""The Apache Beam engine of data.engine=beam (the llm_jax[beam] extra): curate.py, gate.py (the 13-gram
contamination gate) and pack.py write the local engine's files (llm_jax/data/curate.py, prepare.py) byte for
byte from a Beam runner's workers; runner.py runs a pipeline. Imported only when that engine is chosen."""

import logging

from llm_jax.errors import UserError

_disabled = logging.root.manager.disable
logging.disable(max(_disabled, logging.WARNING))  # Beam's import warns about Google Cloud clients not used here
try:
    import apache_beam  # noqa: F401
except ImportError:
    raise UserError("data.engine=beam needs Apache Beam: pip install 'llm_jax[beam]'") from None
finally:
    logging.disable(_disabled)
