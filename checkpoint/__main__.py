from checkpoint.cli import main

main()
