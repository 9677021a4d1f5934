"""Models a real run touches: the family registry, loading, image-only processors and reference
shapes. (The built-in tiny model and its pretraining live in :mod:`llava_mole.toy`.)"""
