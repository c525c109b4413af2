from echo_mlx.cli import main

main()
