#!/bin/bash
# First start on an empty data directory: initialise it the way the mysql image does, with a
# temporary server that has no networking (so a TCP healthcheck stays red until the real one
# listens): root's password from MYSQL_ROOT_PASSWORD, for root@'%' as well, and the database
# MYSQL_DATABASE owned by MYSQL_USER / MYSQL_PASSWORD. Then, or on any later start, the command.
set -euo pipefail

DATADIR=/var/lib/mysql
SOCKET=/run/mysqld/init.sock

sql_string() {  # sql_string TEXT: TEXT as a quoted SQL string literal
	printf "'%s'" "${1//\'/\'\'}"
}

initialise() {
	: "${MYSQL_ROOT_PASSWORD:?MYSQL_ROOT_PASSWORD must be set}"
	chown -R mysql:mysql "$DATADIR" /run/mysqld
	mariadb-install-db --user=mysql --datadir="$DATADIR" --skip-test-db >/dev/null
	mariadbd --user=mysql --skip-networking --socket="$SOCKET" &
	local pid=$! waited=0
	until mariadb-admin --socket="$SOCKET" ping >/dev/null 2>&1; do
		if [ "$waited" -ge 60 ]; then
			echo "entrypoint: the temporary server did not start" >&2
			exit 1
		fi
		sleep 1
		waited=$((waited + 1))
	done
	local root_pw user_pw
	root_pw=$(sql_string "$MYSQL_ROOT_PASSWORD")
	{
		echo "ALTER USER root@localhost IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD($root_pw);"
		echo "CREATE USER root@'%' IDENTIFIED BY $root_pw;"
		echo "GRANT ALL ON *.* TO root@'%' WITH GRANT OPTION;"
		if [ -n "${MYSQL_DATABASE:-}" ]; then
			echo "CREATE DATABASE IF NOT EXISTS \`${MYSQL_DATABASE}\`;"
		fi
		if [ -n "${MYSQL_USER:-}" ]; then
			user_pw=$(sql_string "${MYSQL_PASSWORD:?MYSQL_PASSWORD must be set with MYSQL_USER}")
			echo "CREATE USER $(sql_string "$MYSQL_USER")@'%' IDENTIFIED BY $user_pw;"
			if [ -n "${MYSQL_DATABASE:-}" ]; then
				echo "GRANT ALL ON \`${MYSQL_DATABASE}\`.* TO $(sql_string "$MYSQL_USER")@'%';"
			fi
		fi
	} | mariadb --socket="$SOCKET" -uroot
	mariadb-admin --socket="$SOCKET" -uroot shutdown
	wait "$pid"
	echo "entrypoint: initialised $DATADIR"
}

if [ "${1:-}" = mariadbd ] && [ ! -d "$DATADIR/mysql" ]; then
	initialise
fi
exec "$@"
