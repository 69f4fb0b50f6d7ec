"""``python -m hypha_conda_plugin``: see ``cli.main``."""

from hypha_conda_plugin.cli import main

if __name__ == "__main__":
    main()
