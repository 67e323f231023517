"""Fails when an ELF binary carries debug info or a symbol table: what ships
is built stripped (Cargo.toml's release profile; `--profile profiling`
keeps symbols for perf). Reads the section headers itself, so that the
check needs nothing but Python."""

import struct
import sys


def section_names(path):
    with open(path, "rb") as file:
        data = file.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise SystemExit(f"{path}: not a 64-bit ELF binary")
    endian = "<" if data[5] == 1 else ">"
    (section_offset,) = struct.unpack_from(endian + "Q", data, 0x28)
    entry_size, count, names_index = struct.unpack_from(endian + "HHH", data, 0x3A)

    def header(index):
        return struct.unpack_from(endian + "IIQQQQIIQQ", data, section_offset + index * entry_size)

    names_offset = header(names_index)[4]
    names = []
    for index in range(count):
        name_at = names_offset + header(index)[0]
        names.append(data[name_at : data.index(b"\0", name_at)].decode())
    return names, len(data)


failed = False
for path in sys.argv[1:]:
    names, size = section_names(path)
    carried = [name for name in names if name == ".symtab" or name.startswith(".debug_")]
    print(f"{path}: {size / 1e6:.1f} MB, {'not stripped: ' + ', '.join(carried) if carried else 'stripped'}")
    failed |= bool(carried)
sys.exit(1 if failed else 0)
