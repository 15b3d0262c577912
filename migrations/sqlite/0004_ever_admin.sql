-- keyward schema v4: remember which accounts have ever held role `admin`.
-- The one-admin shortcut (invitations without a second approver) exists only
-- while at most one such account has ever existed, so disabling or lowering
-- the other admin cannot reopen it.
ALTER TABLE admins ADD COLUMN ever_admin INTEGER NOT NULL DEFAULT 0;
UPDATE admins SET ever_admin = 1 WHERE role = 'admin';
