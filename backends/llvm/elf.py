"""The symbol table of an ELF64 little-endian relocatable object, read without LLVM.

Object code from the cache or an artifact is checked with this before MCJIT sees it:
MCJIT trusts its input, and a damaged object crashes the process. Every offset and size
is checked against the data; anything out of bounds or unexpected is an ElfError.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

EM_X86_64, EM_AARCH64, EM_PPC64, EM_RISCV = 62, 183, 21, 243
MACHINES = {"x86_64": EM_X86_64, "aarch64": EM_AARCH64, "arm64": EM_AARCH64, "powerpc64le": EM_PPC64,
            "riscv64": EM_RISCV}

_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")    # Elf64_Ehdr
_SECTION = struct.Struct("<IIQQQQIIQQ")         # Elf64_Shdr
_SYMBOL = struct.Struct("<IBBHQQ")              # Elf64_Sym
ET_REL, SHT_SYMTAB, SHT_STRTAB = 1, 2, 3
STB_GLOBAL, STB_WEAK = 1, 2
SHN_UNDEF, SHN_LORESERVE = 0, 0xFF00


class ElfError(ValueError):
    pass


@dataclass
class Symbols:
    machine: int
    defines: list[str]   # global and weak symbols defined here, in table order
    needs: list[str]     # global and weak symbols used here and defined elsewhere


def machine_of(triple: str) -> int | None:
    """The ELF machine number of a target triple's architecture, None when unknown."""
    return MACHINES.get(triple.split("-", 1)[0])


def symbols(data: bytes) -> Symbols:
    """The global symbols an object defines and needs; ElfError when it is not a well-formed
    ELF64 little-endian relocatable object."""
    if len(data) < _HEADER.size:
        raise ElfError("too short for an ELF header")
    (ident, e_type, machine, _version, _entry, _phoff, shoff, _flags, _ehsize, _phentsize, _phnum,
     shentsize, shnum, _shstrndx) = _HEADER.unpack_from(data, 0)
    if ident[:4] != b"\x7fELF":
        raise ElfError("not an ELF object")
    if ident[4] != 2 or ident[5] != 1:
        raise ElfError("not a 64-bit little-endian ELF object")
    if e_type != ET_REL:
        raise ElfError(f"ELF type {e_type}, not a relocatable object")
    if shentsize != _SECTION.size or shnum == 0:
        raise ElfError("no section headers of the expected size")
    _bounds(data, shoff, shnum * _SECTION.size, "the section headers")
    sections = [_SECTION.unpack_from(data, shoff + i * _SECTION.size) for i in range(shnum)]
    tables = [i for i, s in enumerate(sections) if s[1] == SHT_SYMTAB]
    if len(tables) != 1:
        raise ElfError(f"{len(tables)} symbol tables, not one")
    _name, _type, _flags, _addr, offset, size, link, _info, _align, entsize = sections[tables[0]]
    if entsize != _SYMBOL.size or size % _SYMBOL.size:
        raise ElfError("a symbol table of an unexpected entry size")
    _bounds(data, offset, size, "the symbol table")
    if not 0 < link < shnum or sections[link][1] != SHT_STRTAB:
        raise ElfError("the symbol table links to no string table")
    str_offset, str_size = sections[link][4], sections[link][5]
    _bounds(data, str_offset, str_size, "the string table")
    strings = data[str_offset:str_offset + str_size]
    defines, needs = [], []
    for at in range(offset + _SYMBOL.size, offset + size, _SYMBOL.size):  # entry 0 is the null symbol
        name_at, info, _other, shndx, _value, _size = _SYMBOL.unpack_from(data, at)
        if info >> 4 not in (STB_GLOBAL, STB_WEAK):
            continue
        name = _string(strings, name_at)
        if shndx == SHN_UNDEF:
            needs.append(name)
        elif shndx < SHN_LORESERVE and shndx >= shnum:
            raise ElfError(f"symbol {name!r} is in section {shndx} of {shnum}")
        else:
            defines.append(name)
    return Symbols(machine, defines, needs)


def _bounds(data: bytes, offset: int, size: int, what: str) -> None:
    if offset < 0 or size < 0 or offset + size > len(data):
        raise ElfError(f"{what} lie outside the object ({offset}+{size} of {len(data)} bytes)")


def _string(strings: bytes, at: int) -> str:
    end = strings.find(b"\0", at)
    if at >= len(strings) or end < 0:
        raise ElfError("a symbol name lies outside the string table")
    try:
        name = strings[at:end].decode("ascii")
    except UnicodeDecodeError:
        raise ElfError("a symbol name is not ASCII") from None
    if not name:
        raise ElfError("a global symbol has no name")
    return name
