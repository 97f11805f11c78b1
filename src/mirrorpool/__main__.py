from mirrorpool.cli.main import main

main()
