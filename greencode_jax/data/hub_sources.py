"""Code from Hugging Face `datasets` (a directory saved by `save_to_disk`, or a hub dataset) and
from TensorFlow Datasets (a prepared dataset directory, or a registry name): token-level rows with
a `code` field become a `LinesSource`, line-level rows with `input` and `gt` a `LineLevelSource`."""

from __future__ import annotations

from pathlib import Path

from greencode_jax.data.source_kinds import _SPLIT_NAMES, LineLevelSource, LinesSource, check_codexglue_line, \
    check_line_sample
from greencode_jax.errors import GreencodeError


def _as_line(code, where: str) -> str:
    """A `code` field (a list of tokens, or a line) -> a checked CodeXGLUE line."""
    if isinstance(code, bytes):
        code = code.decode("utf-8")
    if not isinstance(code, str):
        tokens = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in code]
        if tokens and tokens[0] != "<s>":
            tokens = ["<s>", *tokens]
        if tokens and tokens[-1] != "</s>":
            tokens = [*tokens, "</s>"]
        code = " ".join(tokens)
    return check_codexglue_line(code, where)


def _rows_source(description: str, lang: str, columns, splits: dict):
    """Shared by HF and TFDS: `splits` maps a split name to a function yielding row dicts."""
    columns = set(columns)
    if {"input", "gt"} <= columns:
        def samples():
            for split_rows in splits.values():  # the hub's line-level set calls its test split "train"
                for index, row in enumerate(split_rows()):
                    row = {k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in row.items()
                           if k in ("id", "input", "gt")}
                    yield check_line_sample(row, f"{description}, row {index}", index)
        return LineLevelSource(description, lang, samples)
    if "code" not in columns:
        raise GreencodeError(f"{description}: expected a 'code' column (token-level) or 'input' and 'gt' columns "
                             f"(line-level), found {sorted(columns)}")
    named = {}
    for name, rows in splits.items():
        split = _SPLIT_NAMES.get(name)
        if split is None:
            raise GreencodeError(f"{description}: split {name!r} is not one of {sorted(_SPLIT_NAMES)}")

        def lines(rows=rows, name=name):
            for index, row in enumerate(rows()):
                yield f"{name}:{index}", _as_line(row["code"], f"{description}, split {name}, row {index}")
        named[split] = lines
    return LinesSource(description, lang, named)


def _hf_splits(dataset) -> tuple[list, dict]:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        parts = dict(dataset)
    else:
        parts = {"train": dataset}
    columns = set()
    for part in parts.values():
        columns |= set(part.column_names)
    return sorted(columns), {name: (lambda part=part: iter(part)) for name, part in parts.items()}


def hf_disk_source(path: Path, lang: str):
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises several types for a damaged directory
        raise GreencodeError(f"{path}: cannot load as a Hugging Face `datasets` directory ({error})") from None
    columns, splits = _hf_splits(dataset)
    return _rows_source(f"Hugging Face dataset saved in {path}", lang, columns, splits)


def hf_hub_source(name: str, config: str, lang: str):
    """A hub dataset (network): only reached when the user names it."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, config)
    except Exception as error:
        raise GreencodeError(f"hf:{name} (config {config}): cannot load from the Hugging Face hub ({error}); "
                             "without network, save it elsewhere with `datasets` and pass that directory") from None
    columns, splits = _hf_splits(dataset)
    return _rows_source(f"Hugging Face dataset {name} ({config})", lang, columns, splits)


def _tfds_rows(builder, description: str, lang: str):
    features = builder.info.features
    columns = list(features.keys()) if hasattr(features, "keys") else []
    splits = {}
    for split_name, info in builder.info.splits.items():
        if not info.num_examples:
            continue

        def rows(split_name=split_name):
            source = builder.as_data_source(split=split_name)
            for index in range(len(source)):
                yield source[index]
        splits[split_name] = rows
    if not splits:
        raise GreencodeError(f"{description}: the dataset has no examples")
    return _rows_source(description, lang, columns, splits)


def tfds_directory_source(path: Path, lang: str):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder_from_directory(str(path))
    except Exception as error:
        raise GreencodeError(f"{path}: cannot open as a TFDS dataset directory ({error})") from None
    if builder.info.file_format is None or builder.info.file_format.value != "array_record":
        raise GreencodeError(f"{path}: TFDS dataset in {builder.info.file_format} format; random access without "
                             "TensorFlow needs array_record (rebuild it with file_format='array_record')")
    return _tfds_rows(builder, f"TFDS dataset in {path}", lang)


def tfds_registry_source(name: str, lang: str, data_dir: str | None):
    """A TFDS name (`huggingface:code_x_glue_cc_code_completion_token/python`, …): prepared in `data_dir`,
    downloading only because the user named it."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            builder.download_and_prepare(file_format="array_record")
    except Exception as error:
        raise GreencodeError(f"tfds:{name}: cannot load ({error}); without network, pass the prepared dataset's "
                             "directory instead") from None
    return _tfds_rows(builder, f"TFDS dataset {name}", lang)
