"""Default locations of the built-in offline world, relative to the current directory.

The shipped tiny configs (``configs/tiny-*.yaml``) point here, so ``llava-mole make-tiny``,
``llava-mole make-data`` and ``llava-mole train configs/tiny-mole.yaml`` work in sequence.
"""

DEFAULT_WORK_DIR = "llava-mole-work"
DEFAULT_TINY_MODEL_DIR = f"{DEFAULT_WORK_DIR}/tiny-llava"
DEFAULT_DATA_DIR = f"{DEFAULT_WORK_DIR}/data"
