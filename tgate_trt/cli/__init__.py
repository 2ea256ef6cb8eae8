"""The ``tgate`` command: one entry point whose subcommands are the stage CLIs (``tgate-export`` etc.)."""
