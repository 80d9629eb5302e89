from zoo_agent.cli.main import main

main()
