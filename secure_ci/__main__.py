from secure_ci.cli import main

main()
