"""What watches the operations: :mod:`.stages` (the named stages of a create and a teardown, and
their timer), :mod:`.opstats` (the node's counters of operations and their outcomes) and
:mod:`.metrics` (node_exporter's textfile from both and the VM records). Nothing is imported
here, so a module that needs only the stages loads only them."""
