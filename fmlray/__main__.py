from fmlray.cli import command

command()
