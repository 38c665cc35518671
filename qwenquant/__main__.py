from qwenquant.cli import run

run()
