"""How to run a federation: the ``dfl`` command, the one-machine launcher, and (beside this
package) the deployment files."""
