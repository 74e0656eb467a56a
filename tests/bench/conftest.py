from tests.eval.conftest import tiny_data, trained_dir  # noqa: F401  (the same session fixtures)
