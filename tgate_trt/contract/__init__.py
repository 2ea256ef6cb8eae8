"""What every stage shares and no stage owns: user errors, bounds, safe file output, CLI plumbing."""
