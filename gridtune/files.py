"""Every text file gridtune reads, read one way: bundled files by path, user files by `read_text`.

User files (sweep configs, the price table, datasets for `finetune`) may come from any editor:
UTF-8 with or without a byte-order mark, or UTF-16/UTF-32 with one (Windows tools write these) are
read correctly; anything else is refused with one line that names the actual problem. Bundled
files are found next to this module, however the package was imported (an installed package, a
source checkout, or a namespace package when a folder named `gridtune` is in the current folder).
"""

from __future__ import annotations

import codecs
from pathlib import Path

from gridtune.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent

# Longest first: the UTF-32 LE mark starts with the UTF-16 LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"), (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"), (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
)


def bundled(*parts: str) -> Path:
    """The path of a file shipped inside the package, e.g. bundled("sweeps", "superhero.toml")."""
    return PACKAGE_DIR.joinpath(*parts)


def decode_text(data: bytes, source: str, what: str = "text file") -> str:
    """`data` as text: UTF-8, or any UTF with a byte-order mark; else UserError naming the problem."""
    for bom, codec, label in _BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom):].decode(codec)
            except UnicodeDecodeError as exc:
                raise UserError(f"{source}: starts with a {label} byte-order mark but is not valid {label} "
                                f"(byte {exc.start + len(bom)}): save it as UTF-8") from None
    if b"\x00" in data:
        raise UserError(f"{source}: this is a binary file (or UTF-16 without a byte-order mark), not a {what}: "
                        "save it as UTF-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{source}: not UTF-8 text (byte {exc.start}, line {line}: {data[exc.start:exc.start + 1]!r}; "
                        "perhaps Latin-1 or Windows-1252): save it as UTF-8") from None


def read_text(path: str | Path, what: str = "text file") -> str:
    """Read a user's text file (see the module docstring); UserError with one line if it cannot be used."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{source}: is a folder, not a {what}") from None
    except OSError as exc:
        raise UserError(f"{source}: cannot read: {exc.strerror}") from None
    return decode_text(data, source, what)
