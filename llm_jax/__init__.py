"""llm_jax: build a large language model from scratch in JAX."""

import glob
import importlib.util
import os
from pathlib import Path

__version__ = "0.1.0"


def _quiet_plugins_without_accelerators() -> None:
    """libtpu (the dev and tpu extras) and jax's CUDA plugin (the cuda extra) let `llm-jax compile`
    run on any machine. On a machine without any accelerator each would probe for one at every
    JAX start and print errors (libtpu's C++ complaints, the CUDA plugin's traceback). There, before any JAX backend
    starts: the CPU is the platform (as JAX would end up choosing anyway), libtpu gets the two
    values it asks for and may load in several processes at once. A TPU on the PCI bus (Google's
    vendor id, as JAX's own check reads it), an NVIDIA or AMD device leaves everything untouched."""
    tpu = importlib.util.find_spec("libtpu") is not None
    cuda = importlib.util.find_spec("jax_plugins") is not None and bool(glob.glob(_plugins_dir() + "/xla_cuda*"))
    if not (tpu or cuda):
        return
    if _accelerator_present():
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if tpu and "TPU_WORKER_HOSTNAMES" not in os.environ:
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # any valid name: no chip is opened
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiles in two processes at once
        os.environ["TPU_WORKER_HOSTNAMES"] = "localhost"


def _accelerator_present() -> bool:
    """A TPU, NVIDIA or AMD device on the PCI bus (vendor ids 0x1ae0, 0x10de, 0x1002; a display
    adapter of those vendors counts too, which only leaves JAX to probe as it always does), or a
    GPU device node. Unreadable: assume one (touch nothing)."""
    try:
        vendors = {Path(p).read_text().strip() for p in glob.glob("/sys/bus/pci/devices/*/vendor")}
    except OSError:
        return True
    nodes = glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd") or os.path.exists("/dev/dxg")
    return bool(vendors & {"0x1ae0", "0x10de", "0x1002"}) or bool(nodes)


def _plugins_dir() -> str:
    spec = importlib.util.find_spec("jax_plugins")
    return next(iter(spec.submodule_search_locations), "") if spec and spec.submodule_search_locations else ""


_quiet_plugins_without_accelerators()
