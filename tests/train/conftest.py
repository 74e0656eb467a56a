from tests.data.conftest import one_thread, prepared, tokenizer_dir  # noqa: F401  (shared fixtures)
