"""Where code comes from: every form of `--source`, resolved to one of three kinds.

* `FileSource`: source files to preprocess (the running Python's standard library, a
  JDK's `src.zip`, any directory or `.zip` of `.py` / `.java` files).
* `LinesSource`: documents already in CodeXGLUE token-level form, with the splits the
  source provides (CodeXGLUE `train.txt` / `dev.txt` / `test.txt`, the Hugging Face
  `google/code_x_glue_cc_code_completion_token` copies, TFDS datasets with a `code` field).
* `LineLevelSource`: CodeXGLUE line-level samples `{id, input, gt}` (`test.json`, the
  Hugging Face `google/code_x_glue_cc_code_completion_line` copies, TFDS datasets with
  `input` and `gt`).

`resolve_source` never touches the network unless the spec names a hub dataset
(`hf:OWNER/NAME`, one of the two CodeXGLUE hub ids) or a TFDS registry name (`tfds:NAME`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Iterator

from greencode_jax.data.hub_sources import hf_disk_source, hf_hub_source, tfds_directory_source, tfds_registry_source
from greencode_jax.data.source_kinds import (FileSource, LineLevelSource, LinesSource, check_codexglue_line,
                                             check_line_sample)
from greencode_jax.errors import GreencodeError

EXTENSIONS = {"python": ".py", "java": ".java"}
HF_TOKEN_ID = "google/code_x_glue_cc_code_completion_token"
HF_LINE_ID = "google/code_x_glue_cc_code_completion_line"
CODEXGLUE_FILES = {"train.txt": "train", "dev.txt": "dev", "valid.txt": "dev", "test.txt": "test"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git", ".hg", ".svn"}
# Where JDKs are installed, searched after $JAVA_HOME and the `java` on PATH.
JVM_DIRS = ["/usr/lib/jvm", "/usr/local/lib/jvm", "/opt/java", "/opt/jdk", "/Library/Java/JavaVirtualMachines"]

SOURCE_HELP = ("stdlib (Python's standard library), jdk or jdk:MODULE,… (a JDK's src.zip), a directory or .zip of "
               ".py/.java files, a CodeXGLUE directory with train.txt/dev.txt/test.txt, a line-level test.json, "
               "a directory saved by Hugging Face `datasets`, a TFDS dataset directory, hf:OWNER/NAME[:CONFIG] "
               f"(or {HF_TOKEN_ID} / {HF_LINE_ID}), or tfds:NAME")


def read_ref(origin: tuple, _zips: dict = {}) -> bytes:  # noqa: B006 (a per-process cache of open zips)
    """The bytes of one file; raises OSError (or zipfile.BadZipFile) if it cannot be read."""
    if origin[0] == "fs":
        with open(origin[1], "rb") as f:
            return f.read()
    archive = _zips.get(origin[1])
    if archive is None:
        archive = _zips[origin[1]] = zipfile.ZipFile(origin[1])
    return archive.read(origin[2])


# ---------------------------------------------------------------------------------------- resolving


def resolve_source(spec: str | None, lang: str, tfds_data_dir: str | None = None):
    """`--source` -> FileSource, LinesSource or LineLevelSource; GreencodeError if it names nothing usable."""
    if lang not in EXTENSIONS:
        raise GreencodeError(f"--lang {lang!r}: expected python or java")
    if spec is None:
        spec = "stdlib" if lang == "python" else "jdk"
    if spec == "stdlib":
        if lang != "python":
            raise GreencodeError("--source stdlib is Python's standard library; for --lang java use jdk, or a "
                                 "directory or .zip of .java files")
        return stdlib_source()
    if spec == "jdk" or spec.startswith("jdk:"):
        if lang != "java":
            raise GreencodeError("--source jdk is a JDK's Java sources; for --lang python use stdlib, or a "
                                 "directory or .zip of .py files")
        modules = [m for m in spec[4:].split(",") if m] if spec.startswith("jdk:") else []
        return jdk_source(find_jdk_src_zip(), modules)
    if spec.startswith("hf:") or spec in (HF_TOKEN_ID, HF_LINE_ID):
        name, _, config = spec.removeprefix("hf:").partition(":")
        return hf_hub_source(name, config or lang, lang)
    if spec.startswith("tfds:"):
        return tfds_registry_source(spec[5:], lang, tfds_data_dir)
    path = Path(spec).expanduser()
    if not path.exists():
        raise GreencodeError(f"--source {spec}: no such file or directory; --source takes {SOURCE_HELP}")
    if path.is_file():
        if zipfile.is_zipfile(path):
            return zip_source(path, lang)
        if path.name in CODEXGLUE_FILES:
            return codexglue_lines_source({CODEXGLUE_FILES[path.name]: path}, lang, str(path))
        if path.suffix in (".json", ".jsonl"):
            return line_level_json_source(path, lang)
        raise GreencodeError(f"--source {spec}: a file, but not a .zip of sources, a CodeXGLUE train.txt/dev.txt/"
                             f"test.txt or a line-level .json; --source takes {SOURCE_HELP}")
    return _directory_source(path, lang)


def _directory_source(path: Path, lang: str):
    if (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                  and (path / "dataset_info.json").is_file()):
        return hf_disk_source(path, lang)
    if (path / "features.json").is_file() and (path / "dataset_info.json").is_file():
        return tfds_directory_source(path, lang)
    versions = sorted(p for p in path.iterdir() if p.is_dir() and (p / "features.json").is_file()
                      and (p / "dataset_info.json").is_file()) if os.access(path, os.R_OK | os.X_OK) else []
    if versions:  # a TFDS dataset directory NAME/ holding VERSION/ subdirectories: take the newest
        return tfds_directory_source(versions[-1], lang)
    files = {split: path / name for name, split in CODEXGLUE_FILES.items() if (path / name).is_file()}
    if files:
        return codexglue_lines_source(files, lang, str(path))
    if (path / "test.json").is_file():
        return line_level_json_source(path / "test.json", lang)
    return directory_source(path, lang)


def _walk(root: Path, extension: str, errors: list) -> list:
    """Sorted (relative path, origin) of the files ending in `extension`; unreadable subdirectories go to `errors`."""
    if not os.access(root, os.R_OK | os.X_OK):
        raise GreencodeError(f"{root}: directory not readable; check its permissions")
    refs = []
    for directory, dirs, files in os.walk(root, onerror=errors.append):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in files:
            if name.endswith(extension):
                full = Path(directory) / name
                refs.append((full.relative_to(root).as_posix(), ("fs", str(full))))
    refs.sort()
    return refs


def directory_source(root: Path, lang: str) -> FileSource:
    extension = EXTENSIONS[lang]
    errors = []
    refs = _walk(root, extension, errors)
    if not refs:
        raise GreencodeError(f"{root}: no {extension} files found (searched recursively, skipping hidden and "
                             f"site-packages directories); --source takes {SOURCE_HELP}")
    return FileSource(f"{len(refs)} {extension} files under {root}", lang, refs, [str(e.filename) for e in errors])


def zip_source(path: Path, lang: str, modules=()) -> FileSource:
    extension = EXTENSIONS[lang]
    try:
        with zipfile.ZipFile(path) as archive:
            names = [i.filename for i in archive.infolist() if not i.is_dir() and i.filename.endswith(extension)]
    except (OSError, zipfile.BadZipFile) as error:
        raise GreencodeError(f"{path}: cannot read as a zip archive ({error})") from None
    if modules:
        found = sorted({n.split("/", 1)[0] for n in names})
        names = [n for n in names if n.split("/", 1)[0] in modules]
        if not names:
            raise GreencodeError(f"{path}: no {extension} files in module(s) {', '.join(modules)}; modules in the "
                                 f"archive: {', '.join(found[:40])}")
    if not names:
        raise GreencodeError(f"{path}: no {extension} files in this zip archive; --source takes {SOURCE_HELP}")
    refs = sorted((n, ("zip", str(path.resolve()), n)) for n in names)
    what = f" (modules {', '.join(modules)})" if modules else ""
    return FileSource(f"{len(refs)} {extension} files in {path}{what}", lang, refs)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source() -> FileSource:
    """The running Python's standard library (tests included), without site-packages."""
    root = stdlib_root()
    errors = []
    refs = _walk(root, ".py", errors)
    if not refs:
        raise GreencodeError(f"{root}: this Python's standard library has no .py files (a stripped install?); "
                             "pass --source DIR with Python files")
    version = ".".join(map(str, sys.version_info[:3]))
    return FileSource(f"the standard library of Python {version}: {len(refs)} .py files under {root}", "python", refs,
                      [str(e.filename) for e in errors])


def jdk_search_places(java_home: str | None = None, search_dirs=None) -> list[Path]:
    """Candidate src.zip paths, most specific first: $JAVA_HOME, the `java` on PATH, then JVM directories."""
    places = []
    java_home = os.environ.get("JAVA_HOME") if java_home is None else java_home
    homes = [Path(java_home)] if java_home else []
    java = shutil.which("java")
    if java:
        homes.append(Path(java).resolve().parent.parent)
    if search_dirs is None:
        search_dirs = JVM_DIRS
    for directory in map(Path, search_dirs):
        if directory.is_dir():
            homes += sorted(p for p in directory.iterdir() if p.is_dir())
            homes += [p / "Contents" / "Home" for p in sorted(directory.iterdir()) if (p / "Contents").is_dir()]
    for home in homes:
        places += [home / "lib" / "src.zip", home / "src.zip"]
    return list(dict.fromkeys(places))


def find_jdk_src_zip(java_home: str | None = None, search_dirs=None) -> Path:
    """The first existing, readable JDK `src.zip` (dangling links, as left by a JDK without its
    source package, are skipped); GreencodeError saying where it looked otherwise."""
    places = jdk_search_places(java_home, search_dirs)
    for place in places:
        if place.is_file() and zipfile.is_zipfile(place):
            return place
    looked = ", ".join(str(p) for p in places[:8]) + (f" and {len(places) - 8} more" if len(places) > 8 else "")
    looked = looked or "no JDK (no JAVA_HOME, no java on PATH, nothing in " + ", ".join(JVM_DIRS) + ")"
    raise GreencodeError(f"no Java sources found: looked for a JDK src.zip in {looked}; "
                         "install a JDK with its sources (Debian/Ubuntu: apt-get install openjdk-17-source) or set "
                         "JAVA_HOME, or pass --source DIR_OR_ZIP with .java files")


def jdk_source(src_zip: Path, modules=()) -> FileSource:
    source = zip_source(src_zip, "java", modules)
    what = f" of modules {', '.join(modules)}" if modules else ""
    source.description = f"the JDK sources in {src_zip}: {len(source.refs)} .java files{what}"
    return source


# ---------------------------------------------------------------------------------- CodeXGLUE files


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 text file; empty lines at the very end are allowed."""
    try:
        with open(path, encoding="utf-8", newline="\n") as f:
            pending = []
            for number, line in enumerate(f, 1):
                if not line.strip():
                    pending.append(number)
                    continue
                if pending:
                    raise GreencodeError(f"{path}:{pending[0]}: empty line inside a CodeXGLUE file "
                                         "(one document per line expected)")
                yield number, line
    except UnicodeDecodeError as error:
        raise GreencodeError(f"{path}: not valid UTF-8 ({error}); CodeXGLUE files are UTF-8 text") from None
    except OSError as error:
        raise GreencodeError(f"{path}: cannot read ({error.strerror or error})") from None


def codexglue_lines_source(files: dict, lang: str, where: str) -> LinesSource:
    def reader(split_path: Path):
        def lines():
            for number, line in _text_lines(split_path):
                yield f"{split_path.name}:{number}", check_codexglue_line(line, f"{split_path}:{number}")
        return lines

    for split_path in files.values():
        if not os.access(split_path, os.R_OK):
            raise GreencodeError(f"{split_path}: not readable; check its permissions")
    names = ", ".join(p.name for p in files.values())
    return LinesSource(f"CodeXGLUE token-level files {names} in {where}", lang,
                       {split: reader(p) for split, p in files.items()})


def line_level_json_source(path: Path, lang: str) -> LineLevelSource:
    def samples():
        for number, line in _text_lines(path):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                raise GreencodeError(f"{path}:{number}: not JSON ({error.msg}); expected one JSON object per line "
                                     "with 'input' and 'gt'") from None
            yield check_line_sample(obj, f"{path}:{number}", number - 1)

    if not os.access(path, os.R_OK):
        raise GreencodeError(f"{path}: not readable; check its permissions")
    return LineLevelSource(f"CodeXGLUE line-level samples in {path}", lang, samples)
