"""The registrar process: owns the ZooKeeper session and the nodes.

Kept free of imports: the master imports ``zkprefork.registrar.protocol``
and must not get kazoo with it."""
