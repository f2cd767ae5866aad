"""Setting a Hyperfleet cluster up and running it, in subpackages by role.

| subpackage           | role                                                        | runtime? |
|----------------------|-------------------------------------------------------------|----------|
| `cli`                | the `hyperfleet` command, the local stack (`up`/`down`)     | yes      |
| `node`               | the node agent: a VM's entrypoint, GPUs, `ray start`        | yes      |
| `join`               | one-time join tickets and the head's join service           | yes      |
| `hypercore`          | the typed client of Hypercore's cluster API                 | yes      |
| `emulator`           | stand-in: the Anthropic Messages API on loopback            | no       |
| `hypercore_standin`  | stand-in: Hypercore's cluster API, workloads as processes   | no       |

No runtime module imports a stand-in (an import-linter contract in `pyproject.toml` checks it);
the CLI loads each one inside the command that serves it. This package imports nothing, so
`import cluster.node.agent` loads the node agent alone.
"""
