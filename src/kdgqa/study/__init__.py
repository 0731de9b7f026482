"""Studies: configs, data, training, the experiment grid, reports and fidelity. Nothing here
is imported by ``import kdgqa``; ``kdgqa experiment`` and ``kdgqa.run_experiment`` load it."""
