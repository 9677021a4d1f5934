"""Images stored inside a Hugging Face dataset: which cells hold one, and their bytes on demand.

An image column is a `datasets` ``Image`` feature (``{bytes, path}`` structs, also what PIL
images are stored as), a binary column, a string column of paths, or a list of those (at most
one image per row is used). `ImageReader` finds each row's image cell in a batch of rows without
reading any bytes; `ArrowImageColumn` reads one image's bytes from the memory-mapped table when
the image is opened (`llava_mole.data.images.EmbeddedImage`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .formats import DataConfigError

__all__ = ["ArrowImageColumn", "ImageReader", "image_reader"]


class ArrowImageColumn:
    """The image column of a memory-mapped dataset: reads one image's bytes on demand.

    Holds the `datasets` table (which pickles as its file path, so DataLoader workers re-map
    the file instead of copying it).
    """

    def __init__(self, table: Any, column: str, name: str, is_list: bool) -> None:
        self.table = table
        self.column = column
        self.name = name
        self.is_list = is_list

    def image_bytes(self, row: int, item: int) -> bytes:
        value = self.table.column(self.column)[row].as_py()
        if self.is_list:
            value = value[item]
        if isinstance(value, dict):
            value = value.get("bytes")
        if not isinstance(value, bytes):
            raise ValueError(f"{self.name} row {row}: no image bytes")
        return value


def _image_kind(column_type: Any) -> str | None:
    """'struct' ({bytes, path}), 'binary', 'string' or 'null' (no images); None otherwise."""
    import pyarrow as pa

    if pa.types.is_null(column_type):
        return "null"
    if pa.types.is_struct(column_type) and column_type.get_field_index("bytes") >= 0:
        return "struct"
    if pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type):
        return "binary"
    if pa.types.is_string(column_type) or pa.types.is_large_string(column_type):
        return "string"
    return None


def _image_cells(array: Any, kind: str) -> list[tuple[bool, str | None] | None]:
    """Per cell: None (no image), or (has_bytes, path)."""
    import pyarrow.compute as pc

    if kind == "null":
        return [None] * len(array)
    if kind == "binary":
        return [(True, None) if v else None for v in pc.is_valid(array).to_pylist()]
    if kind == "string":
        return [None if p is None else (False, p) for p in array.to_pylist()]
    valid = pc.is_valid(array).to_pylist()
    has_bytes = pc.is_valid(pc.struct_field(array, "bytes")).to_pylist()
    has_path = array.type.get_field_index("path") >= 0
    paths = pc.struct_field(array, "path").to_pylist() if has_path else [None] * len(valid)
    return [
        (b, p) if v and (b or p) else None for v, b, p in zip(valid, has_bytes, paths, strict=True)
    ]


@dataclass
class ImageReader:
    """Finds each row's image (single column or one-element list column) in a batch."""

    store: ArrowImageColumn
    kind: str

    def batch(self, column: Any) -> list[tuple[int, tuple[bool, str | None]] | int | None]:
        """Per row: None (no image), the number of images if more than one, or (item, cell)."""
        import pyarrow.compute as pc

        if not self.store.is_list:
            return [None if c is None else (0, c) for c in _image_cells(column, self.kind)]
        lengths = [n or 0 for n in pc.list_value_length(column).to_pylist()]
        cells = iter(_image_cells(pc.list_flatten(column), self.kind))
        out: list[tuple[int, tuple[bool, str | None]] | int | None] = []
        for n in lengths:
            row_cells = [next(cells) for _ in range(n)]
            present = [(k, c) for k, c in enumerate(row_cells) if c is not None]
            out.append(None if not present else present[0] if len(present) == 1 else len(present))
        return out


def image_reader(ds: Any, roles: Mapping[str, str], name: str) -> ImageReader | None:
    import pyarrow as pa

    role = "image" if "image" in roles else "images" if "images" in roles else None
    if role is None:
        return None
    column_type = ds.data.schema.field(roles[role]).type
    is_list = pa.types.is_list(column_type) or pa.types.is_large_list(column_type)
    kind = _image_kind(column_type.value_type if is_list else column_type)
    if kind is None:
        raise DataConfigError(
            f"dataset {name}: column {roles[role]!r} (columns.{role}) has type {column_type}, "
            "not an image ({bytes, path}), bytes or a path"
        )
    store = ArrowImageColumn(ds.data, roles[role], f"{name}:{roles[role]}", is_list)
    return ImageReader(store, kind)
