from malt_local.cli import cli

if __name__ == "__main__":
    cli()
