"""What the server may learn: differential privacy and secure aggregation (`privacy=`).

- `dp`: clipping an update and the privacy budget (plain NumPy and Opacus, no Flower);
- `dp_sgd`: record-level DP-SGD at a site (privacy=dp_sgd): Poisson sampling, each
  record's gradient (or zeroth-order scalar) clipped, Gaussian noise, the round's plan
  against the site's budget (torch, no Flower); `ledger`: what a site has spent, kept
  in its node state (records only);
- `dp_server`: Flower's client-side fixed-clipping wrapper around our strategy, with
  the budget accounted every round;
- `secagg`: SecAgg+ rounds on the server (`SecAggFedAvg`); `secagg_client`: the
  client's side of them (its reply, and Flower's client mod that masks it);
- `runner`: what a run uses: the strategy and the runner `privacy=` asks for, and
  its summary.

Clients clip their own updates under `privacy=dp` (`fedllm_flwr.node`), with the norm
Flower's wrapper sends them; under `privacy=dp_sgd` a client's training loop takes its
steps from `dp_sgd` (`fedllm_flwr.client.local_train`, and zeroth-order's
`local_round`). Nothing is imported here, so `privacy.dp` stays a leaf that the
strategies can use.
"""
