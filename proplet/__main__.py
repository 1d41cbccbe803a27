from proplet.cli import main

main()
