from datasteer.cli import main

main()
