"""ferflow: facial expression and valence-arousal models on in-the-wild video (ABAW, Aff-Wild2).

Each pipeline stage is a module with a command-line interface (``python -m ferflow.<stage>``);
the Snakemake workflow in ``workflow/`` only wires files to these commands.
"""

__version__ = "0.1.0"
