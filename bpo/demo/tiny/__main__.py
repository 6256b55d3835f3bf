import argparse

from bpo.demo.tiny import FAMILIES, __doc__, write_family, write_tiny_llava


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bpo.demo.tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--family", choices=sorted(FAMILIES), help="a replica of a real family instead of bpo's LLaVA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=32, help="bpo's LLaVA only")
    parser.add_argument("--num-layers", type=int, default=2, help="bpo's LLaVA only")
    parser.add_argument("--image-size", type=int, default=32, help="bpo's LLaVA only (LLaVA-1.5: 336)")
    parser.add_argument("--patch-size", type=int, default=8, help="bpo's LLaVA only (LLaVA-1.5: 14)")
    args = parser.parse_args(argv)
    if args.family:
        path = write_family(args.family, args.out_dir, seed=args.seed)
        print(f"wrote a tiny {args.family} replica to {path}")
    else:
        path = write_tiny_llava(args.out_dir, seed=args.seed, hidden_size=args.hidden_size,
                                num_layers=args.num_layers, image_size=args.image_size, patch_size=args.patch_size)
        print(f"wrote tiny LLaVA to {path}")


if __name__ == "__main__":
    main()
