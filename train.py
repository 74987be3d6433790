"""Pretrain a language model: `python train.py --config configs/<name>.yaml [section.key=value ...]`.

The same command as `llm-jax train`; running it again resumes from the newest checkpoint.
"""

import sys

from llm_jax.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
