"""Quality tasks scored through the engine: perplexity, needle retrieval, multiple choice.
``eval/registry.py`` registers them; ``eval/cli.py`` wires `slimlm eval` and `slimlm report`."""
