"""The paper's synthetic two-stage benchmark: environment, runner, plots and the ``rag-capg simulate`` CLI."""
