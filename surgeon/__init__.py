"""surgeon: find every strided convolution and pooling layer in a PyTorch model and replace it
by policy.

    import surgeon
    result = surgeon.scan(model, example_input)
    model, report = surgeon.patch(model, "spd", example_input)
    model = surgeon.load("out/resnet50-spd")
    result = surgeon.heal(model, original, "photos/", steps=2000)
    ranking = surgeon.search(original, "photos/", budget=2000, out="search/")
"""

__version__ = "0.1.0"

# The Python API mirrors the CLI. `patch`, `scan`, `heal` and `search` are also the names of the
# modules that implement them; binding the functions here (after those modules are imported)
# makes `surgeon.patch(...)` the call, while `from surgeon.patch import PatchReport` still works.
from surgeon.api import load, load_original, save, upgrade
from surgeon.heal import heal
from surgeon.patch import patch
from surgeon.scan import scan
from surgeon.search import search

__all__ = [
    "__version__",
    "heal",
    "load",
    "load_original",
    "patch",
    "save",
    "scan",
    "search",
    "upgrade",
]
