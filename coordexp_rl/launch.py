"""The main job's entry point: `python -m coordexp_rl.launch [--config FILE] [key.sub=value ...]`.

The driver itself (config -> Ray placement -> Stage-1 -> Stage-2 EM loop -> evaluation -> export) is
``coordexp_rl.driver.driver``; this module keeps the command users and ``ray job submit`` type.
"""

import sys

from coordexp_rl.runtime import prepare_runtime

prepare_runtime()  # first: Ray, vLLM and transformers read some of its environment defaults at import

from coordexp_rl.driver.driver import main  # noqa: E402 -- after prepare_runtime, on purpose

if __name__ == "__main__":
    sys.exit(main())
