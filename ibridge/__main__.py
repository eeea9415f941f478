from ibridge.cli import main

main()
