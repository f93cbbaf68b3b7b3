from deployster.cli import run

run()
