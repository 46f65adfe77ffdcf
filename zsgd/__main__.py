from zsgd.cli import main

main()
