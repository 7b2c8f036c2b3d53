from trajflow.cli import main

main()
