"""The local runtime: the same template, ASL and handlers on one machine, no AWS account."""
