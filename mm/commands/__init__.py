"""One module per ``mm`` subcommand.

Each has ``add_parser(subparsers)`` (argparse only: importing the module must stay light, so ``mm --help`` is quick)
and ``run(args) -> int`` (the exit status; heavy imports such as torch happen inside). ``mm.cli`` lists them.
"""
