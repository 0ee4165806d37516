import os, shutil
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent/"shared"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

@pytest.fixture(scope="session")
def llama3_tokenizer_model():
    "Path of the real Llama-3 tiktoken file when `../shared/llama3/tokenizer.model` exists, else None."
    p = SHARED/"llama3"/"tokenizer.model"
    return p if p.exists() else None

@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory, llama3_tokenizer_model):
    from anita.core import tiny_llama3
    return tiny_llama3(tmp_path_factory.mktemp("models")/"tiny-llama3", tokenizer_model=llama3_tokenizer_model)

@pytest.fixture(scope="session")
def embedded_dir():
    from anita.core import embedded_base
    return embedded_base()

@pytest.fixture(scope="session")
def shared_data():
    "The application data under ../shared/data (skips the test when absent)."
    d = SHARED/"data"
    if not d.exists(): pytest.skip("../shared/data not present")
    return d

def execute_notebook(name:str, root, **params):
    "Run `nbs/<name>.ipynb` with papermill (cwd `nbs/`) into `root/<name>.out.ipynb`, outputs under `root/<run>/`."
    pm = pytest.importorskip("papermill")
    return pm.execute_notebook(str(ROOT/"nbs"/f"{name}.ipynb"), str(Path(root)/f"{name}.out.ipynb"), cwd=str(ROOT/"nbs"),
                               parameters=dict(root=str(root), **params), progress_bar=False)
