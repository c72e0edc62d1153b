from lmlp.cli import main

main()
