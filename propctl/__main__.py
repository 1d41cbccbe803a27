from propctl.cli import main

main()
