from pathlib import Path

import pytest

from src.synth import generate


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """Real MILK10k CSV rows (no images); attribution: "MILK study team", CC-BY-NC."""
    return Path(__file__).parent / "fixtures" / "milk10k_sample"


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated miniature MILK10k (120 training and 30 test lesions, with JPEGs); treat it as read-only."""
    return generate(tmp_path_factory.mktemp("mini") / "milk10k", n_train=120, n_test=30, seed=0)
