from soce.app import main

main()
