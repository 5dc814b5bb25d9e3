"""Every command in README.md's code blocks runs as written, with small stand-ins where a
download or a long run would be needed. An example that stops working fails this test.

What runs
- A fenced block with no language (or bash, sh, shell, console) is a shell session: its lines,
  each without its trailing `# comment`, run in order in a fresh directory, and each must exit
  0. `surgeon ARGS` runs in-process through the real entry point (tests/clirun.py). `make
  TARGET` runs the `surgeon` command of the Makefile's recipe for TARGET; the targets in
  MAKE_SKIPPED are skipped, with the reason given there. Any other command fails the test:
  teach `_run_shell` to run it.
- A ```python block runs with exec() in a fresh directory and must not raise.
- ```yaml blocks are data: the first one is the `my_policy.yaml` the README's commands use.

Stand-ins: edit these tables when you add an example
- SUBSTITUTIONS: (pattern, replacement, why) rows applied in order with `re.sub` (multiline) to
  each shell command, and to Python blocks where the row says so. Large models become small
  ones, inputs become 64 px, evaluations take fewer image pairs.
- FILES: files the README assumes its reader has (their own weights file, the policy they
  wrote, folders of images), written into a session's directory when one of its commands
  names them.
- `torchrun ... -m surgeon ARGS` runs as `surgeon ARGS` (each torchrun process runs
  `python -m surgeon ARGS`); tests/test_cli_heal.py runs the real torchrun on two processes.
- Pretrained weights: `--pretrained` and hub names read the torch hub and Hugging Face caches,
  which `_seed_caches` fills with random weights of the stand-in models (the session's caches
  are temporary and offline, see conftest.py). A new pretrained example needs its stand-in
  seeded there.
- `--install-completion` runs with HOME at a temporary directory and bash as the shell.
"""

from __future__ import annotations

import re
import shlex
import shutil
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch

from surgeon.models import load_model
from tests.clirun import run_cli
from tests.hubcache import HubCache, seed_torch_hub

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGUAGES = ("", "bash", "sh", "shell", "console")

Kind = Literal["shell", "python"]


@dataclass(frozen=True)
class Substitution:
    """A stand-in: `pattern` becomes `replacement` in the commands of the kinds listed."""

    pattern: str
    replacement: str
    why: str
    kinds: tuple[Kind, ...] = ("shell",)

    def apply(self, text: str, kind: Kind) -> str:
        if kind not in self.kinds:
            return text
        return re.sub(self.pattern, self.replacement, text, flags=re.MULTILINE)


SUBSTITUTIONS = [
    Substitution(
        r"\bresnet50 --pretrained IMAGENET1K_V2\b",
        "mobilenet_v3_large --pretrained IMAGENET1K_V2",
        "a 100 MB download: a small model with an IMAGENET1K_V2 enum, seeded in torch hub's cache",
    ),
    Substitution(
        r"hf-hub:timm/resnet50\.a1_in1k\b",
        "hf-hub:timm/test_resnet.r160_in1k",
        "a hub name needs the hub: timm's tiny test ResNet, seeded in the Hugging Face cache",
    ),
    Substitution(
        r"timm:convnext_tiny\.fb_in22k_ft_in1k_384\b",
        "timm:test_convnext.r160_in1k",
        "28 M parameters at 384 px: timm's tiny test ConvNeXt, also a tagged name",
    ),
    Substitution(
        r"\bresnet50\b",
        "resnet18",
        "a quarter of the work, the same eight downsampling sites",
        kinds=("shell", "python"),
    ),
    Substitution(
        r"\(1, 3, 224, 224\)", "(1, 3, 64, 64)", "small example inputs", kinds=("python",)
    ),
    Substitution(
        r"^(surgeon (?:scan|patch|placements) inception_v3\b(?!.*--input-size).*)$",
        r"\1 --input-size 3x75x75 --model-kwarg init_weights=false",
        "inception_v3's smallest input; its default initialisation draws from scipy (seconds)",
    ),
    Substitution(
        r"^(surgeon (?:scan|patch|placements) (?!.*--input-size).*)$",
        r"\1 --input-size 3x32x32",
        "small example inputs",
    ),
    Substitution(
        r"^(surgeon upgrade out/old-ckpt)\b",
        r"\1 --trust-import tests.tiny_models:tiny_resnet",
        "the version-1 stand-in (tests/data/v1) rebuilds a tiny model from a test factory",
    ),
    Substitution(
        r'surgeon\.upgrade\("out/old-ckpt"\)',
        'surgeon.upgrade("out/old-ckpt", trust_import=["tests.tiny_models:tiny_resnet"])',
        "the same stand-in from Python",
        kinds=("python",),
    ),
    Substitution(
        r"^(surgeon eval .*)$",
        r"\1 --pairs 4 --input-size 3x32x32",
        "4 shift-consistency pairs instead of 64, small inputs",
    ),
    Substitution(
        r"^((?:torchrun .*-m )?surgeon heal .*?)(?: --steps \d+)?$",
        r"\1 --steps 2 --batch-size 4 --workers 0 --device cpu",
        "2 steps of 4 images (the stand-in folders hold a few dozen), on the CPU",
    ),
    Substitution(
        r"^((?:torchrun .*-m )?surgeon search .*?) --budget \d+(.*)$",
        r"\1 --budget 4\2 --max-placements 4 --batch-size 4 --workers 0 --device cpu"
        " --input-size 3x32x32",
        "4 steps over 4 sampled placements of 32 px images, on the CPU",
    ),
    Substitution(
        r" --epochs 1 ",
        " ",
        "2 steps (the row above) instead of a pass over the folder",
    ),
    Substitution(
        r"steps=2000, batch_size=64,",
        "steps=2, batch_size=4, workers=0, device='cpu', input_size=(3, 64, 64),",
        "the same from Python, at the example's 64 px",
        kinds=("python",),
    ),
]


def _stand_in_weights(path: Path, readme: str) -> None:
    """The reader's own trained weights: those of the stand-in model (resnet18)."""
    torch.save(load_model("resnet18", seed=1).model.state_dict(), path)


def _readme_policy(path: Path, readme: str) -> None:
    """The policy the README shows (its first yaml block)."""
    path.write_text(fenced_blocks(readme, "yaml")[0][2])


def _photos(path: Path, readme: str) -> None:
    """The reader's folder of unlabelled images: a few dozen small generated ones."""
    from tests.heal_fixtures import write_images

    write_images(path, 24, size=40, suffix=".jpg")


def _imagenet(path: Path, readme: str) -> None:
    """The reader's labelled folder (one sub-folder per class): generated, three classes."""
    from tests.heal_fixtures import write_images

    write_images(path, 24, classes=3, size=40)


def _old_checkpoint(path: Path, readme: str) -> None:
    """The reader's version-1 checkpoint: the committed fixture (a tiny test ResNet)."""
    shutil.copytree(ROOT / "tests" / "data" / "v1" / "tiny-spd", path)


FILES: dict[str, Callable[[Path, str], None]] = {
    "r50.pt": _stand_in_weights,
    "my_policy.yaml": _readme_policy,
    "out/old-ckpt": _old_checkpoint,
    "photos/": _photos,
    "imagenet/train": _imagenet,
}

MAKE_SKIPPED = {
    "test": "runs this test suite itself",
    "lint": "ruff and mypy, which CI runs on their own",
}


@dataclass(frozen=True)
class Example:
    """One command of a shell block, or a whole Python block, and where it is in the README."""

    kind: Kind
    text: str
    line: int
    block: int


def fenced_blocks(markdown: str, language: str | None = None) -> list[tuple[int, str, str]]:
    """(line of the first content line, language, text) of each fenced code block."""
    blocks = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^(```+)\s*([\w-]*)", lines[i])
        if opening is None:
            i += 1
            continue
        fence, lang = opening.groups()
        end = i + 1
        while end < len(lines) and not lines[end].startswith(fence):
            end += 1
        if language is None or lang == language:
            blocks.append((i + 2, lang, "\n".join(lines[i + 1 : end]) + "\n"))
        i = end + 1
    return [(line, lang, text) for line, lang, text in blocks]


def extract_examples(markdown: str) -> list[Example]:
    """Every command of the shell blocks and every Python block, in README order."""
    examples = []
    for index, (first, lang, text) in enumerate(fenced_blocks(markdown)):
        if lang == "python":
            examples.append(Example("python", text, first, index))
        elif lang in SHELL_LANGUAGES:
            for offset, raw in enumerate(text.splitlines()):
                command = _without_comment(raw).strip()
                if command:
                    examples.append(Example("shell", command, first + offset, index))
    return examples


def _without_comment(line: str) -> str:
    """The command before its comment: a `#` at the start or after a space, as in a shell."""
    return re.sub(r"(^|\s)#.*$", "", line)


def substituted(example: Example) -> str:
    text = example.text
    for substitution in SUBSTITUTIONS:
        text = substitution.apply(text, example.kind)
    return text


def _make_recipe(target: str) -> str | None:
    """The surgeon command in the Makefile's recipe for `target`, or None if it has none."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    if recipe is None:
        return None
    for line in recipe.group(1).splitlines():
        found = re.search(r"\$\(BIN\)/(surgeon .*)$", line.strip())
        if found:
            return found.group(1)
    return None


def _run_shell(command: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str] | None:
    """(exit code, stdout, stderr) of one command, or None for a skipped make target."""
    words = shlex.split(command)
    if words[:1] == ["make"] and len(words) == 2:
        if words[1] in MAKE_SKIPPED:
            return None
        recipe = _make_recipe(words[1])
        if recipe is None:
            raise AssertionError(f"`{command}`: no surgeon command in the Makefile's recipe")
        example = Example("shell", recipe, 0, 0)
        return _run_shell(substituted(example), capsys)
    if words[:1] == ["torchrun"] and "-m" in words and words[words.index("-m") + 1] == "surgeon":
        words = words[words.index("-m") + 1 :]  # what each of torchrun's processes runs
    if words[:1] != ["surgeon"]:
        raise AssertionError(f"`{command}`: tests/test_readme.py does not know how to run this")
    return run_cli(capsys, *words[1:])


def run_examples(
    examples: Sequence[Example],
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    *,
    readme: str = "",
) -> int:
    """Run the examples, each code block in a fresh directory under `workdir`; return how many
    ran. The first one that fails raises an AssertionError naming its README line."""
    ran = 0
    for block, items in _by_block(examples):
        session = workdir / f"block-{block}"
        session.mkdir()
        monkeypatch.chdir(session)
        for name, write in FILES.items():
            if any(name in example.text for example in items):
                write(session / name, readme)
        for example in items:
            command = substituted(example)
            if example.kind == "python":
                _run_python(command, example)
                ran += 1
                continue
            where = f"README.md line {example.line}: `{example.text}`"
            if command != example.text:
                where += f" (run as `{command}`)"
            result = _run_shell(command, capsys)
            if result is None:
                continue
            code, _, err = result
            assert code == 0, f"{where} exited with {code}:\n{err}"
            ran += 1
    return ran


def _run_python(code: str, example: Example) -> None:
    """exec() a Python block; a failure names the README line that raised."""
    filename = f"README.md:{example.line}"
    try:
        exec(compile(code, filename, "exec"), {"__name__": "__readme__"})
    except Exception as exc:
        line = example.line
        for frame, lineno in traceback.walk_tb(exc.__traceback__):
            if frame.f_code.co_filename == filename:
                line = example.line + lineno - 1
        raise AssertionError(
            f"README.md line {line}: the Python block starting at line {example.line} "
            f"raised {type(exc).__name__}: {exc}"
        ) from exc


def _by_block(examples: Sequence[Example]) -> Iterator[tuple[int, list[Example]]]:
    blocks: dict[int, list[Example]] = {}
    for example in examples:
        blocks.setdefault(example.block, []).append(example)
    yield from blocks.items()


def _seed_caches(hub_cache: HubCache, workdir: Path) -> None:
    """The pretrained weights the stand-ins load: random, written by the test."""
    from torchvision.models import MobileNet_V3_Large_Weights

    state = load_model("mobilenet_v3_large", seed=2).model.state_dict()
    seed_torch_hub(MobileNet_V3_Large_Weights.IMAGENET1K_V2.url, state)
    hub_cache.seed_timm("test_resnet.r160_in1k", workdir)


@pytest.fixture
def readme_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME and TORCH_HOME in a temporary directory; bash as the user's shell."""
    import shellingham

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(shellingham, "detect_shell", lambda: ("bash", "/bin/bash"))
    return tmp_path


def test_every_readme_example_runs(
    readme_environment: Path,
    hub_cache: HubCache,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readme = (ROOT / "README.md").read_text()
    examples = extract_examples(readme)
    _seed_caches(hub_cache, readme_environment)
    ran = run_examples(examples, readme_environment, capsys, monkeypatch, readme=readme)
    skipped = sum(e.text in (f"make {t}" for t in MAKE_SKIPPED) for e in examples)
    assert ran == len(examples) - skipped, "an example was neither run nor skipped"
    assert (readme_environment / "home" / ".bash_completions" / "surgeon.sh").is_file()


BROKEN = """\
Some prose.

```
surgeon policies            # works
surgeon scan resnet18 --no-such-option
```

```python
import surgeon
surgeon.load("no/such/checkpoint")
```
"""


def test_extractor_finds_each_command_and_python_block_with_its_line() -> None:
    examples = extract_examples(BROKEN + "```yaml\nname: x\n```\n")
    assert [(e.kind, e.line, e.block) for e in examples] == [
        ("shell", 4, 0),
        ("shell", 5, 0),
        ("python", 9, 1),
    ]
    assert examples[0].text == "surgeon policies", "the trailing comment was kept"
    assert examples[2].text.startswith("import surgeon")


def test_substitutions_shrink_the_models_and_inputs() -> None:
    def run_as(text: str, kind: Kind = "shell") -> str:
        return substituted(Example(kind, text, 1, 0))

    assert run_as("surgeon scan resnet50") == "surgeon scan resnet18 --input-size 3x32x32"
    assert run_as("surgeon patch x --input-size 3x9x9") == "surgeon patch x --input-size 3x9x9"
    assert run_as("surgeon scan hf-hub:timm/resnet50.a1_in1k").startswith(
        "surgeon scan hf-hub:timm/test_resnet.r160_in1k"
    )
    assert run_as("m = resnet50(); x = (1, 3, 224, 224)", "python") == (
        "m = resnet18(); x = (1, 3, 64, 64)"
    )


@pytest.mark.parametrize(
    ("cut", "line", "problem"),
    [(None, 5, "exited with 2"), ("surgeon scan resnet18 --no-such-option\n", 10, "raised")],
    ids=["shell", "python"],
)
def test_a_broken_example_fails_naming_its_readme_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    cut: str | None,
    line: int,
    problem: str,
) -> None:
    markdown = BROKEN if cut is None else BROKEN.replace(cut, "surgeon --version\n")
    with pytest.raises(AssertionError, match=rf"README\.md line {line}: .*{problem}"):
        run_examples(extract_examples(markdown), tmp_path, capsys, monkeypatch)
