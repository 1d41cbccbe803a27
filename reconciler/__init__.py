"""The reconcile pass: source, loader, observe, diff, placement, plan, converge."""
