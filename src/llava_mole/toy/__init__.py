"""The offline toy world: synthetic domains and their tiny models, for demos and for testing
the study on data it was not tuned for."""

#: The worlds of :mod:`llava_mole.toy.worlds` (named here so the CLI lists them cheaply).
WORLD_NAMES: tuple[str, ...] = ("styles", "skills", "unequal")
