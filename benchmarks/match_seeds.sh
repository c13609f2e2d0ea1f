set -e
for seed in 1 2; do
  neuralode flow --target U3 --model planar_cnf --width 17 --iters 1500 --lr 5e-3 --lr-schedule constant --anneal 0 --batch-size 256 --tol 1e-5 --seed $seed --no-progress --out runs/match_seeds/U3-planar_cnf-s$seed
  neuralode flow --target U3 --model planar --K 34 --iters 1500 --lr 5e-3 --lr-schedule constant --anneal 0.5 --batch-size 256 --tol 1e-5 --seed $seed --no-progress --out runs/match_seeds/U3-planar-s$seed
  neuralode flow --target U4 --model planar_cnf --width 17 --iters 1500 --lr 5e-3 --lr-schedule constant --anneal 0.5 --batch-size 256 --tol 1e-5 --seed $seed --no-progress --out runs/match_seeds/U4-planar_cnf-s$seed
  neuralode flow --target U4 --model planar --K 34 --iters 1500 --lr 5e-3 --lr-schedule constant --anneal 0 --batch-size 256 --tol 1e-5 --seed $seed --no-progress --out runs/match_seeds/U4-planar-s$seed
done
